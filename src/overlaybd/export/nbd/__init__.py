"""The NBD protocol (pure encode/parse in ``protocol``) and an asyncio server (``server``)."""
