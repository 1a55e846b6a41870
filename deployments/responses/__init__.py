"""The Responses API (POST /v1/responses and its GET/DELETE routes): request models, the conversation rendered from
input items and `previous_response_id`, output items and typed stream events, and the store of responses."""
