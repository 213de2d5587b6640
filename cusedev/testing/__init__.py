"""For tests of LUO clients: ``Emulator`` (a device on a private path) and the pytest plugin."""
