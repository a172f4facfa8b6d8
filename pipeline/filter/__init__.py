"""Crawl-corpus filtering: readers, text extraction, language ID, URL lists, quality rules, PII."""
