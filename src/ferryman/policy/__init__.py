"""Grants: who may reach which listener, with which permissions and limits (SPEC §3)."""
