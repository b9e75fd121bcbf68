"""Pipeline stages: each a small typer entrypoint, ``python -m stages.<name>``; see dvc.yaml."""
