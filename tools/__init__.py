"""Tools that drive real tidelog processes from outside: launcher, fault injection, chaos runs."""
