//! API tokens: issued with a digest of their secret, revoked once.

use ud_schemas::events::{AuthEvent, TokenIssued, TokenRevoked};
use ud_schemas::{Millis, ProjectId, TokenId};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub id: TokenId,
    pub name: String,
    pub projects: Vec<ProjectId>,
    pub admin: bool,
    pub user: Option<String>,
    pub expires_at: Option<Millis>,
    pub revoked: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenCommand {
    Issue {
        name: String,
        /// Hex SHA-256 of the secret; the secret itself is never recorded.
        digest: String,
        projects: Vec<ProjectId>,
        admin: bool,
        user: Option<String>,
        expires_at: Option<Millis>,
    },
    Revoke,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token not found")]
    NotFound,
    #[error("token already issued")]
    AlreadyIssued,
}

pub fn decide(
    token: Option<&Token>,
    command: TokenCommand,
    now: Millis,
) -> Result<Vec<AuthEvent>, TokenError> {
    match (token, command) {
        (
            None,
            TokenCommand::Issue {
                name,
                digest,
                projects,
                admin,
                user,
                expires_at,
            },
        ) => Ok(vec![AuthEvent::TokenIssued(TokenIssued {
            at: now,
            name,
            digest,
            projects,
            admin,
            user,
            expires_at,
        })]),
        (Some(_), TokenCommand::Issue { .. }) => Err(TokenError::AlreadyIssued),
        (None, TokenCommand::Revoke) => Err(TokenError::NotFound),
        // Revoking again changes nothing.
        (Some(t), TokenCommand::Revoke) if t.revoked => Ok(vec![]),
        (Some(_), TokenCommand::Revoke) => {
            Ok(vec![AuthEvent::TokenRevoked(TokenRevoked { at: now })])
        }
    }
}

pub fn evolve(token: Option<Token>, id: TokenId, event: &AuthEvent) -> Option<Token> {
    match (token, event) {
        (_, AuthEvent::TokenIssued(e)) => Some(Token {
            id,
            name: e.name.clone(),
            projects: e.projects.clone(),
            admin: e.admin,
            user: e.user.clone(),
            expires_at: e.expires_at,
            revoked: false,
        }),
        (None, AuthEvent::TokenRevoked(_)) => None,
        (Some(mut t), AuthEvent::TokenRevoked(_)) => {
            t.revoked = true;
            Some(t)
        }
    }
}

impl crate::aggregate::Aggregate for Token {
    type Id = TokenId;
    type Command = TokenCommand;
    type Event = AuthEvent;
    type Error = TokenError;

    const STREAM: &'static str = ud_schemas::streams::AUTH;

    fn scope(id: &TokenId) -> String {
        ud_schemas::subjects::token_all(id)
    }

    fn wrap(id: TokenId, event: AuthEvent) -> ud_schemas::Event {
        ud_schemas::Event::Auth(id, event)
    }

    fn unwrap(event: ud_schemas::Event) -> Option<(TokenId, AuthEvent)> {
        match event {
            ud_schemas::Event::Auth(id, e) => Some((id, e)),
            _ => None,
        }
    }

    fn decide(
        state: Option<&Self>,
        command: TokenCommand,
        now: Millis,
    ) -> Result<Vec<AuthEvent>, TokenError> {
        decide(state, command, now)
    }

    fn evolve(state: Option<Self>, id: TokenId, event: &AuthEvent) -> Option<Self> {
        evolve(state, id, event)
    }

    fn settled(&self) -> bool {
        self.revoked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_issued_once_and_revoked_once() {
        let id = TokenId::new();
        let issue = TokenCommand::Issue {
            name: "alice".into(),
            digest: "d".into(),
            projects: vec![],
            admin: true,
            user: None,
            expires_at: None,
        };
        let issued = decide(None, issue.clone(), 1).unwrap_or_default();
        assert_eq!(issued.len(), 1);
        let token = issued.iter().fold(None, |t, e| evolve(t, id, e));
        assert_eq!(
            decide(token.as_ref(), issue, 2),
            Err(TokenError::AlreadyIssued)
        );
        let revoked = decide(token.as_ref(), TokenCommand::Revoke, 3).unwrap_or_default();
        assert_eq!(
            revoked,
            vec![AuthEvent::TokenRevoked(TokenRevoked { at: 3 })]
        );
        let token = revoked.iter().fold(token, |t, e| evolve(t, id, e));
        assert_eq!(decide(token.as_ref(), TokenCommand::Revoke, 4), Ok(vec![]));
        assert_eq!(
            decide(None, TokenCommand::Revoke, 5),
            Err(TokenError::NotFound)
        );
    }
}
