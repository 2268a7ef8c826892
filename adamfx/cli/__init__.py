"""adamfx's command-line tools; the library never imports them."""
