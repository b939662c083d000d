"""Grant limits that span connections: concurrent connections and bandwidth windows."""
