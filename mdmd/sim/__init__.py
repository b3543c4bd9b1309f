"""Windows device emulator and fleet simulator (mdmd-sim)."""
