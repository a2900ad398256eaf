"""The sans-I/O core: HTTP/1.1 request parsing, checks and response framing, with no asyncio,
no transport and no loaded Config, so that tests drive it with bytes in and bytes out."""
