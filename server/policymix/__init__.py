"""policymix: serve mixtures of language-model policies behind the OpenAI API."""

__version__ = "0.1.0"
