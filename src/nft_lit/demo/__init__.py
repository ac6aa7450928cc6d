"""Demo-only code, kept out of the library's core: the SFT warm-up of the CPU demo's base policy."""
