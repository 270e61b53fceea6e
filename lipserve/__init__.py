"""lipserve core library (never imports Ray)."""
