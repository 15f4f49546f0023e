"""The server's request limits, importable without the web stack (the command's parser needs
their defaults on machines that only run benchmarks)."""

# The default limit of a request body (a larger one is refused with 413): room for a prompt of a
# million tokens, as token ids or as text with JSON's escapes.
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
