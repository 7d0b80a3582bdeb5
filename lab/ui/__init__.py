"""The web lab (Gradio): app.py assembles one module per tab."""
