"""The gallery store: enrolled subjects and templates, and 1:N search over them."""
