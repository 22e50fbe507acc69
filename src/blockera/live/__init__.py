"""Live devices: era tracking put under a device's users in one command, kept across reboots,
and the jobs run on top of it (consistent backups, replication, cache invalidation), on the
userspace engine and on the kernel's device-mapper alike. See docs/live-devices.md."""
