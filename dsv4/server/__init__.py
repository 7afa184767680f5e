"""The OpenAI-compatible HTTP server (``dsv4 serve``).

* :mod:`~dsv4.server.app`: the FastAPI app and its routes; :mod:`~dsv4.server.launch`: uvicorn start-up.
* :mod:`~dsv4.server.protocol`, :mod:`~dsv4.server.messages`: request bodies (pydantic, strict);
  :mod:`~dsv4.server.responses`: response bodies and stream chunks.
* :mod:`~dsv4.server.chat`, :mod:`~dsv4.server.completions`: the two generation endpoints;
  :mod:`~dsv4.server.serving`: what they share (choices, cancellation).
* :mod:`~dsv4.server.logprobs`, :mod:`~dsv4.server.metrics`, :mod:`~dsv4.server.errors`.
"""
