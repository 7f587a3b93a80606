"""The Gradio web app: layout, handlers, presets and the price-tag template."""
