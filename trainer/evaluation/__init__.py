"""What runs are judged and shown by: feature spaces and the digit classifier (evaluation job), plots and the progress
image (evaluation and train jobs), photo recall."""
