"""The base model: resolving a reference to local weights, loading it onto a device, and saving trained artifacts."""
