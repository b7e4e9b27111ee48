"""Python client and `vlora` command line for a vlora server (OpenAI API, /health, adapter admin)."""

from vlora.client.client import VloraAPIError, VloraClient, image_part, user_message

__all__ = ["VloraAPIError", "VloraClient", "image_part", "user_message"]
