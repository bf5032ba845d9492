"""The method core: models, instruction data, the emulator (spec, assembly, plug-in), its files
and adapter training. Everything above builds on these modules."""
