"""Demo data built from what ships in installed packages: digits, bundled photos, a synthetic latent cache."""
