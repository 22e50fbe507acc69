"""The `blockera` command line. Thin: parsing, output and exit codes; the work lives below."""
