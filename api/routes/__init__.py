"""One router per resource: files, jobs, backends."""
