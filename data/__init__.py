"""Records: the row schema, readers and writers for every layout and file format, format conversion."""
