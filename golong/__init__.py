"""golong trainer."""
