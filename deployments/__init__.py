"""Ray Serve deployments: the OpenAI-compatible ingress, the router and the attention replicas."""
