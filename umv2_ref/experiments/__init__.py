"""Runnable experiments (``python -m umv2_ref.experiments.<name>``); each prints a Markdown table."""
