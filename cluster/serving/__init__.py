"""The engine as a long-lived service and its front doors: the engine-service actor, the one
reader of a request's event stream, client handles, metrics, and the HTTP API (``http``)."""
