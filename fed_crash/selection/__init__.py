"""Layer selection: which middle layers an emulator keeps."""
