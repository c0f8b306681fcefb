"""my_lab: a method for cl-ext that lives outside cl-ext (docs/extending.md)."""
