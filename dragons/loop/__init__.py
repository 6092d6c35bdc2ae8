"""The loop after a night: labels back in (``labels``), model versions and aliases
(``versions``), a challenger against its champion (``compare``)."""
