"""Kubernetes (KubeRay) manifests; a package so tests can find and validate them."""
