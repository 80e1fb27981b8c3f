"""The pure core: rules, state machines and decisions. No I/O, no clock, no sqlite, no asyncio."""
