"""What a checkpoint or vector holds: inspect statistics, the report/plot, the model card."""
