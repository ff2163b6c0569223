"""Persistent node state: the config store on STATE."""
