"""The OpenAI-compatible HTTP API on Ray Serve: schema, responses and errors, the key and
body-size gate, the deployment and its routes, building and deploying it."""
