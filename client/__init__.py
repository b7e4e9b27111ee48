"""Python client and `vlora` command line for a vlora server (OpenAI API + /health)."""

from client.client import VloraClient, image_part, user_message

__all__ = ["VloraClient", "image_part", "user_message"]
