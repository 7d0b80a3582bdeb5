"""One module per page of the web lab: layout and event wiring only."""
