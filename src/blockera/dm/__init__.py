"""The device-mapper target API: table lines, the `Target` interface and its life cycle, device
references, and the kernel's simple targets (linear, error, zero). Targets (here, in era/ and
snapshot/) build on it; the engines (blockera.engine) run them. See docs/engine.md."""
