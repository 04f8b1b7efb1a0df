"""Development tools: tiny random models in every real file format, for tests and the demo."""
