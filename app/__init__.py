"""The local Gradio chat for mlx-mistral: python -m app --model PATH_OR_REPO_OR_demo."""
