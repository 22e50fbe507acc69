"""The engines that run device-mapper tables behind one interface: the userspace engine
(`userspace.Engine`, given its target types when assembled), its daemon and client, and the
real kernel's device-mapper through dmsetup (`kernel.KernelEngine`); see docs/engine.md."""
