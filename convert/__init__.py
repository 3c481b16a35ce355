"""`python -m convert`: checkpoints to MLX directories (the logic is mlx_mistral.convert)."""
