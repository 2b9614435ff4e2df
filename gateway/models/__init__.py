"""The REST contract as Pydantic models: every request and response body the gateway reads or writes.

FastAPI derives the OpenAPI document from these (gateway/openapi.py adds the
few parts it cannot infer), so the document and the validation cannot drift.
"""
