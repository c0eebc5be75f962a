"""What the evaluation job measures with: feature spaces for FID/KID and the digit classifier."""
