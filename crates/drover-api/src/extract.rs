//! Extractors whose rejections are problem+json with precise codes: a body that is not
//! JSON, is empty, names an unknown field or has the wrong shape each get their own code,
//! as do a bad query string and a path parameter that is not UTF-8. A body is read as the
//! OpenAPI document describes it: a JSON object (never an array standing for a struct's
//! fields), whose integers may be written `3` or `3.0` (one JSON Schema integer). Handlers
//! take these, never axum's own `Path`, `Query` or `Json` (whose rejections are plain
//! text; the router's last resort, `error::problems_only`, would still turn those into
//! problems, but with only their status's generic code).

use axum::body::Bytes;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use drover_domain::ErrorCode;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, FieldError};

/// A JSON body, deserialized strictly.
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let value = json_body(request, state).await?;
        from_body(value).map(ApiJson)
    }
}

/// A JSON body as a value: JSON, sent as JSON, not empty.
async fn json_body<S: Send + Sync>(
    request: Request,
    state: &S,
) -> Result<serde_json::Value, ApiError> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim();
            mime.eq_ignore_ascii_case("application/json")
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
    if !is_json {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "the body must be JSON, sent with `Content-Type: application/json`",
        ));
    }
    let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
        if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(ErrorCode::PayloadTooLarge, rejection.body_text())
        } else {
            ApiError::new(ErrorCode::MalformedJson, rejection.body_text())
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            ErrorCode::EmptyBody,
            "the request body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(&bytes).map_err(|err| {
        ApiError::new(ErrorCode::MalformedJson, format!("the body is not valid JSON: {err}"))
    })
}

/// Reads a body's value as `T`: an object, with integral numbers as integers.
fn from_body<T: DeserializeOwned>(mut value: serde_json::Value) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::new(ErrorCode::InvalidBody, "the body must be a JSON object")
            .with_errors(vec![FieldError {
                field: "body".to_owned(),
                message: "must be a JSON object".to_owned(),
            }]));
    }
    integers_as_integers(&mut value);
    T::deserialize(value).map_err(|err| shape_error(&err.to_string()))
}

/// `3.0` as `3`: JSON Schema counts both as the integer 3, serde only the first.
fn integers_as_integers(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(number) => {
            let integral = number.as_f64().filter(|f| f.fract() == 0.0 && number.is_f64());
            if let Some(float) = integral {
                // Exactly representable: within ±2^53, the float is that integer.
                if float.abs() <= 9_007_199_254_740_992.0 {
                    #[allow(clippy::cast_possible_truncation)]
                    let integer = float as i64;
                    *number = integer.into();
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integers_as_integers),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(integers_as_integers),
        _ => {}
    }
}

/// An optional JSON body: absent when the request has neither a body nor a content type
/// (a bare `POST`), or when the body is `null`; otherwise exactly as strict as
/// [`ApiJson`].
impl<T, S> axum::extract::OptionalFromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        let headers = request.headers();
        let declared_empty = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .is_none_or(|length| length.trim() == "0");
        if !headers.contains_key(header::CONTENT_TYPE)
            && !headers.contains_key(header::TRANSFER_ENCODING)
            && declared_empty
        {
            return Ok(None);
        }
        match json_body(request, state).await? {
            serde_json::Value::Null => Ok(None),
            value => from_body(value).map(|body| Some(ApiJson(body))),
        }
    }
}

/// Maps serde's message about a well-formed but wrongly shaped body to a code and field.
fn shape_error(message: &str) -> ApiError {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or_default().to_owned();
        return ApiError::new(ErrorCode::UnknownField, message.to_owned())
            .with_errors(vec![FieldError { field, message: "unknown field".to_owned() }]);
    }
    let field = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
        .unwrap_or("body")
        .to_owned();
    ApiError::new(ErrorCode::InvalidBody, message.to_owned())
        .with_errors(vec![FieldError { field, message: message.to_owned() }])
}

/// A query string, deserialized strictly.
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|query| ApiQuery(query.0))
            .map_err(|rejection| ApiError::new(ErrorCode::InvalidQuery, rejection.body_text()))
    }
}

/// Path parameters. One that is not UTF-8 once percent-decoded (or does not parse as `T`)
/// is `400 invalid_path`, naming the parameter.
pub(crate) struct ApiPath<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(path) => Ok(ApiPath(path.0)),
            Err(rejection) => Err(path_error(&rejection)),
        }
    }
}

fn path_error(rejection: &PathRejection) -> ApiError {
    // A route whose parameters do not fit its handler is a bug here, not the client's.
    if rejection.status().is_server_error() {
        return ApiError::internal(&rejection.body_text());
    }
    let (field, detail) = match rejection {
        PathRejection::FailedToDeserializePathParams(failed) => match failed.kind() {
            ErrorKind::InvalidUtf8InPathParam { key } => {
                (key.clone(), format!("path parameter `{key}` is not valid UTF-8"))
            }
            ErrorKind::ParseErrorAtKey { key, .. } | ErrorKind::DeserializeError { key, .. } => {
                (key.clone(), failed.body_text())
            }
            _ => ("path".to_owned(), failed.body_text()),
        },
        other => ("path".to_owned(), other.body_text()),
    };
    ApiError::new(ErrorCode::InvalidPath, detail.clone())
        .with_errors(vec![FieldError { field, message: detail }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Body {
        #[allow(dead_code)]
        count: Option<u32>,
    }

    #[test]
    fn a_body_is_an_object_whose_integers_may_be_written_as_floats() {
        use serde_json::json;
        let body: Body = from_body(json!({ "count": 3.0 })).unwrap();
        assert_eq!(body.count, Some(3));
        assert!(from_body::<Body>(json!({ "count": 3.5 })).is_err());
        for not_an_object in [json!([null]), json!([]), json!("x"), json!(1)] {
            let refused = from_body::<Body>(not_an_object.clone()).unwrap_err();
            assert_eq!(refused.code, ErrorCode::InvalidBody, "{not_an_object}");
        }
    }

    #[test]
    fn unknown_and_missing_fields_are_told_apart() {
        let unknown = shape_error("unknown field `colour`, expected `request` or `pipeline`");
        assert_eq!(unknown.code, ErrorCode::UnknownField);
        assert_eq!(unknown.errors[0].field, "colour");
        let missing = shape_error("missing field `request`");
        assert_eq!(missing.code, ErrorCode::InvalidBody);
        assert_eq!(missing.errors[0].field, "request");
    }
}
