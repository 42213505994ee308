"""Built-in components, registered through the same hooks a third-party plugin uses."""
