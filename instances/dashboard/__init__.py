"""The operator dashboard on the control host: server-rendered Django pages.

One module per page (overview, detail, logs, tokens, releases); live parts use the
Channels WebSocket in consumers.py or the API's SSE log stream. Every page needs a
staff login.
"""
