"""Scripts that run under horovodrun on localhost, and the helper that launches them."""
