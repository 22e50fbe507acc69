"""The device-mapper model: tables, targets, named devices with the kernel's life cycle, and
the engines that run them (the userspace engine here; the kernel's through dmsetup)."""
