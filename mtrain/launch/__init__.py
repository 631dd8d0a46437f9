"""Launcher-side helpers: Slurm batch scripts, requeue after the time-limit warning."""
